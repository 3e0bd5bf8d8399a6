"""Plain data shared by the layers above: the Sink interface, history, tokens."""
