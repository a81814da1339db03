"""Scoring, QA pictures, training curves and post-processing choice, as the INSTANCE 2022 organizers score."""
