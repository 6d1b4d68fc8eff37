"""Shipped benchmark datasets: ManyWell-32 (exactly solvable) and the 8x8 digits (real images)."""
