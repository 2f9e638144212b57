"""What people run: command lines, predict on their own images, results tables, reports,
checkpoint conversion, pictures and the demo."""
