"""Responsible fine-tuning: data screening, moderation, safety / bias / overfitting evaluations, audit log,
model cards. Nothing here imports torch at module level, so the service can use the screening and audit
parts in its own process."""
