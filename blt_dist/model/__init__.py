"""Model code: pure PyTorch modules, no distributed code (see DESIGN.md)."""
