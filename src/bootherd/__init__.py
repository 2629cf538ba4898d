"""bootherd: network boot and node configuration for testbeds and clusters."""

__version__ = "0.1.0"
