"""The networks of the three tasks, built from the layers in lact/."""
