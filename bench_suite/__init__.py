"""The PEFT-U benchmark: data, splits, prompts, metric, embedded default model, methods, report."""
