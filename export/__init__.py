"""star_edge.export"""
