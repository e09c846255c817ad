"""The vocabulary every step speaks, torch-free: task and subtask names, question templates,
question files, the chat prompt (Qwen3 non-thinking), answer parsing and the metric names."""
