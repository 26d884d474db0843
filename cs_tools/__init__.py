"""cryoSPARC integration: ``convert`` (plain Dataset/file functions), ``server`` (every call to a
cryoSPARC server, via cryosparc-tools) and ``external_job`` (the ``cryospin-cryosparc`` command).
See docs/cryosparc.md."""
