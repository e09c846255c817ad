"""Deployment: export a fine-tuned model, serve it (LitServe, OpenAI-compatible, non-thinking
enforced), watch it (Prometheus), load-test it and run it as Lightning Studio jobs."""
