"""The demo: train a small transformer through the bridge and find its induction heads."""
