"""``kerb-jupyter doctor`` / ``%kerbstatus --doctor``: every check between "installed" and "my query runs".

May import ``core`` and ``sql``; never ``server`` (it asks a running server over HTTP) or IPython.
"""
