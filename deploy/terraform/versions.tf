# Provider-agnostic: this module only renders what each host needs (cloud-init user-data
# with the systemd units and pnicd.toml); the caller's provider creates the machines.
# See examples/hcloud for one such caller.
terraform {
  required_version = ">= 1.5"
}
