"""LightningModules (one per task) and Lightning callbacks: training logic only, networks live in lact.models."""
