"""The `micronet` stage commands, one module each (Typer functions that read params, call the library and write
outputs). Not empty on purpose: every dvc.yaml lists this file as a dependency, and DVC warns about an empty one."""
