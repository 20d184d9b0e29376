"""Asynchronous parameter server with compressed, error-compensated pushes and pulls.
Not implemented yet: this package is reserved and empty until it lands."""
