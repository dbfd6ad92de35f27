# Three NIC hosts on a private network, linked in a line, one twin on each end.
# Sketch: `terraform init && terraform apply -var twinmesh_package=... -var hcloud_token=...`
terraform {
  required_version = ">= 1.5"
  required_providers {
    hcloud = {
      source  = "hetznercloud/hcloud"
      version = "~> 1.48"
    }
  }
}

variable "hcloud_token" {
  type      = string
  sensitive = true
}

variable "twinmesh_package" {
  type = string
}

variable "ssh_key_names" {
  description = "Names of SSH keys already uploaded to the project."
  type        = list(string)
  default     = []
}

variable "admin_cidrs" {
  description = "Where SSH may come from."
  type        = list(string)
  default     = []
}

provider "hcloud" {
  token = var.hcloud_token
}

locals {
  hosts = {
    nic1 = { address = "10.42.1.11", twins = ["alice"] }
    nic2 = { address = "10.42.1.12", peers = ["nic1"] }
    nic3 = { address = "10.42.1.13", peers = ["nic2"], twins = ["bob"] }
  }
}

module "twinmesh" {
  source           = "../.."
  hosts            = local.hosts
  twinmesh_package = var.twinmesh_package
}

resource "hcloud_network" "mesh" {
  name     = "twinmesh"
  ip_range = "10.42.0.0/16"
}

resource "hcloud_network_subnet" "mesh" {
  network_id   = hcloud_network.mesh.id
  type         = "cloud"
  network_zone = "eu-central"
  ip_range     = "10.42.1.0/24"
}

resource "hcloud_firewall" "nic" {
  name = "twinmesh-nic"

  rule {
    description = "overlay links between the NIC hosts"
    direction   = "in"
    protocol    = "tcp"
    port        = tostring(module.twinmesh.link_port)
    source_ips  = [hcloud_network_subnet.mesh.ip_range]
  }

  dynamic "rule" {
    for_each = length(var.admin_cidrs) > 0 ? [1] : []
    content {
      description = "ssh from the admins"
      direction   = "in"
      protocol    = "tcp"
      port        = "22"
      source_ips  = var.admin_cidrs
    }
  }
}

resource "hcloud_server" "nic" {
  for_each     = local.hosts
  name         = each.key
  image        = "debian-12"
  server_type  = "cx22"
  location     = "nbg1"
  ssh_keys     = var.ssh_key_names
  firewall_ids = [hcloud_firewall.nic.id]
  user_data    = module.twinmesh.user_data[each.key]

  network {
    network_id = hcloud_network.mesh.id
    ip         = each.value.address
  }

  depends_on = [hcloud_network_subnet.mesh]
}

output "servers" {
  value = { for name, server in hcloud_server.nic : name => server.ipv4_address }
}
