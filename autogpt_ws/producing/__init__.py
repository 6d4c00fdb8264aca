"""The producing side, as AutoGPT's executors do it: event builders and envelopes, the publish
command, the demo executor."""
