"""hf_collapse.trainers"""
