"""The error every decoder of network input raises (re-exported by `fedprune.codec`)."""


class CodecError(ValueError):
    """A message that does not fit the model or the mask it claims; the text says which key
    and why."""
