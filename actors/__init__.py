"""Actors: one isolated Trio task per subsystem, talking only through typed memory channels."""
