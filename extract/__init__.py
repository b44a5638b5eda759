"""Datasets, backbones and the one backbone pass that fills a feature cache."""
