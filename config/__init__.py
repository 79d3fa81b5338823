"""Typed settings (config.settings) and the domain values shared by mq, datastore and
worker (config.domain). Import the submodules directly: config.domain needs nothing
beyond the standard library, so producers can use it without the worker's dependencies.
"""
