variable "hosts" {
  description = <<-EOT
    The NIC hosts, by name. address: an IP address of the host that its peers can reach
    (pnicd listens on it); peers: names of hosts this one dials (a link carries traffic
    both ways, so list each link once); key: the host's NIC key once known, to pin it on
    every link to it (`twinctl --nic /var/lib/twinmesh/nic nic self` prints it); twins:
    twin names to run as twind@NAME.service.
  EOT
  type = map(object({
    address = string
    peers   = optional(list(string), [])
    key     = optional(string)
    twins   = optional(list(string), [])
  }))

  validation {
    condition     = length(var.hosts) > 0
    error_message = "hosts: give at least one host."
  }
  validation {
    condition     = alltrue([for name, host in var.hosts : alltrue([for peer in host.peers : contains(keys(var.hosts), peer) && peer != name])])
    error_message = "hosts: every peer must name another host of this map."
  }
  validation {
    condition     = alltrue(flatten([for host in var.hosts : [for twin in host.twins : can(regex("^[a-z0-9][a-z0-9_-]{0,62}$", twin))]]))
    error_message = "hosts: twin names must be lower-case letters, digits, '-' or '_' (they name systemd units)."
  }
}

variable "twinmesh_package" {
  description = "What `pip install` installs on each host, e.g. a wheel URL or 'twinmesh==0.1.0' from your index."
  type        = string

  validation {
    condition     = length(trimspace(var.twinmesh_package)) > 0
    error_message = "twinmesh_package: give a pip requirement or a wheel location."
  }
}

variable "link_port" {
  description = "TCP port pnicd listens on for links from other NICs (open it between the hosts)."
  type        = number
  default     = 9651
}

variable "health_port" {
  description = "Loopback port of pnicd's /healthz and /metrics."
  type        = number
  default     = 9650
}
