"""star_edge.train"""
