"""The ringflow command line: parse, call, print."""
