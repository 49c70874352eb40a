"""The hostile-user suite: attacks tried as unprivileged users on the real dev cluster."""
