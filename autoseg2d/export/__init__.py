"""A finished model as a self-contained MONAI bundle."""
