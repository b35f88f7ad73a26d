from provision.tasks import ns  # noqa: F401  (the tasks: `fab --list`)
