"""Curation: audit datasets against a model's processor, convert formats, filter by rollout pass rate."""
