"""Data sets: the LISA ReasonSeg layout (`reasonseg`), the same data as a Hugging Face folder
(`hf`), and our synthetic reasoning-segmentation benchmark (`synthetic`). Every source yields
`SegSample`s for evaluation; the synthetic generator also yields `SyntheticSample`s for training.
"""
