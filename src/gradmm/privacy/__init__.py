"""Differential privacy: accounting, the noise samplers, privacy reports, membership audits."""
