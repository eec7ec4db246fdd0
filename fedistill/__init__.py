"""fedistill: federated knowledge distillation with site-enforced privacy budgets and verifiable reports."""

__version__ = "0.1.0"
