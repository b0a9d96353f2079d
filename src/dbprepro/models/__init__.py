"""Base models: classifiers and diffusion networks (built, trained, downloaded, loaded)."""
