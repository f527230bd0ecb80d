"""hf_collapse.modeling"""
