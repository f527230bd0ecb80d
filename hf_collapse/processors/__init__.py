"""hf_collapse.processors"""
