"""Running fedprune on Flower's Deployment Engine: credentials and a local federation.

See docs/deployment.md.
"""
