"""Local evaluate metric module; load with evaluate.load(<this folder>)."""
