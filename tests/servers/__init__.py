"""Conformance servers: loopback re-implementations of fleet servers written from the servers'
own sources (not from the gateway's code), to test the gateway against what the real server
accepts, refuses and does."""
