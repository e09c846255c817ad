"""Serving: export a fine-tuned model, serve it (LitServe, OpenAI-compatible, non-thinking
enforced), watch it (Prometheus) and run it as Lightning Studio jobs (the load test is bench.serve)."""
