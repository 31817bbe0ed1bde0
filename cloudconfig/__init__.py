"""#cloud-config (coreos-cloudinit dialect): validate with line numbers, apply to a root, datasources, bootstrap.

validate.py   header rules, YAML node marks -> report entries; schema.py the keys and value checks
apply.py      validate, plan every change (rootfs.Plan), commit; users.py, units.py, bootstrap.py do the parts
datasources.py  file, kernel cmdline URL, config drive, NoCloud, EC2 (IMDSv2)
cli.py        `obelisk cloudconfig validate|apply|fetch`
"""
