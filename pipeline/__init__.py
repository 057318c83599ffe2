"""Transport-agnostic speech pipeline: audio frames in, conversation events and reply audio out."""
