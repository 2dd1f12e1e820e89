"""What runs vitslim end to end: the command line, the demo and the sweep."""
