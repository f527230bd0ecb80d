"""hf_collapse.evals"""
