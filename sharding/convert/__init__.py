"""``edgemesh convert``: a checkpoint read, exported piece by piece, quantised and measured."""
