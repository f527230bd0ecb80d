"""The `hf-collapse` subcommands, one module each (as TRL keeps `trl/scripts/`).

Each module has a `main(argv) -> int` that parses its dataclasses with `transformers.HfArgumentParser`: a
`...ScriptArguments` dataclass for what the command itself needs (model, data, output) and, for training commands,
the trainer's own `...Config(TrainingArguments)`, so a trainer's fields are declared once, under their
`TrainingArguments` names. Demo and bootstrap helpers (the SmolLM2 download, the Fashion-MNIST reader, the bundled
checkpoints) live here too, outside the library's core.
"""
