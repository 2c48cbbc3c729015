"""Built-in samples: small data sets generated from data that installed packages ship (nothing is downloaded)."""
