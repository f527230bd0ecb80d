"""hf_collapse.metrics"""
