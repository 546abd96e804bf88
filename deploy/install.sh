#!/usr/bin/env bash
# Install (or remove) Tandem as systemd services on this machine.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage:
  install.sh --role ROLE [--role ROLE ...] [options]   install and enable services
  install.sh --uninstall [--role ROLE ...] [--purge] [--root DIR]

Installs Tandem under /opt/tandem/venv, its settings under /etc/tandem and the systemd units
tandem-ROLE.service for each ROLE given, then enables them (start them once /etc/tandem/*.env
names the models). Run as root. Safe to run again: it upgrades the software and never
overwrites /etc/tandem/*.env or /etc/tandem/token.

Roles (repeat --role or separate with commas):
  draft         tandem-draft-node.service   (the small model that proposes tokens)
  target        tandem-target-node.service  (the big model that verifies them)
  coordinator   tandem-coordinator.service  (the loop and the HTTP API; best beside the target)

Options:
  --source PATH         the Tandem project to install: a source directory or a wheel
                        (default: the project this script belongs to)
  --python PYTHON       interpreter for the venv, 3.11 or newer (default: python3)
  --torch SPEC          torch requirement installed first (default: torch==2.13.0); the project
                        itself only asks for torch>=2.4, so this pin decides the build
  --torch-index-url URL index for torch, e.g. PyTorch's CPU-only wheel index on a machine
                        without a GPU (a plain torch from PyPI brings the CUDA libraries)
  --no-venv             leave /opt/tandem/venv as it is (settings and units only)
  --now                 also start (or restart) the services now
  --root DIR            lay out settings, token and units under DIR instead of / (for image
                        builds and tests): no system user, no venv, systemctl works offline
  --uninstall           stop and disable the services, remove the units and the venv; keeps
                        /etc/tandem and /opt/tandem/models
  --purge               with --uninstall: also remove /etc/tandem, /opt/tandem (models too),
                        the services' state and cache, and the tandem user
  -h, --help            show this help

pip reads its usual environment, e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR for an offline install.
EOF
}

die() {
	echo "install.sh: $*" >&2
	exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
roles=()
source_path=""
python=python3
torch_spec="torch==2.13.0"
torch_index=""
make_venv=1
start_now=0
root=""
uninstall=0
purge=0

while (($#)); do
	case "$1" in
	--role | --source | --python | --torch | --torch-index-url | --root)
		(($# >= 2)) || die "$1 needs a value (see --help)"
		case "$1" in
		--role)
			IFS=, read -r -a more <<<"$2"
			roles+=("${more[@]}")
			;;
		--source) source_path=$2 ;;
		--python) python=$2 ;;
		--torch) torch_spec=$2 ;;
		--torch-index-url) torch_index=$2 ;;
		--root) root=$2 ;;
		esac
		shift 2
		;;
	--no-venv) make_venv=0; shift ;;
	--now) start_now=1; shift ;;
	--uninstall) uninstall=1; shift ;;
	--purge) purge=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown argument '$1' (see --help)" ;;
	esac
done

units=()
for role in "${roles[@]}"; do
	case "$role" in
	draft | draft-node) units+=(draft-node) ;;
	target | target-node) units+=(target-node) ;;
	coordinator) units+=(coordinator) ;;
	*) die "unknown role '$role': use draft, target or coordinator" ;;
	esac
done
((purge == 0 || uninstall == 1)) || die "--purge only goes with --uninstall"
if [[ -n $root ]]; then
	[[ -d $root ]] || die "--root $root is not a directory"
	root=$(cd "$root" && pwd)
	make_venv=0
	((start_now == 0)) || die "--now cannot start services under --root"
elif ((EUID != 0)); then
	die "run as root (it creates a system user and installs systemd units)"
fi

etc=$root/etc/tandem
opt=$root/opt/tandem
unit_dir=$root/etc/systemd/system
user=tandem

# systemctl against this machine's manager, or offline against the files under --root.
sysctl() {
	if [[ -n $root ]]; then
		systemctl --root="$root" "$@"
	else
		systemctl "$@"
	fi
}

# Files the services read belong to root, group tandem. Not under --root: the group is the
# image's, unknown to this machine.
set_owner() {
	[[ -n $root ]] || chown "root:$user" "$@"
}

do_uninstall() {
	if ((${#units[@]} == 0)); then
		units=(draft-node target-node coordinator)
	fi
	local name
	for name in "${units[@]}"; do
		local unit="tandem-$name.service"
		if [[ -e $unit_dir/$unit ]]; then
			if [[ -n $root ]]; then
				sysctl disable "$unit"
			else
				sysctl disable --now "$unit"
			fi
			rm -f "$unit_dir/$unit"
			echo "removed $unit"
		fi
		if ((purge)); then
			rm -rf "$root/var/lib/tandem-$name" "$root/var/cache/tandem-$name"
		fi
	done
	[[ -n $root ]] || systemctl daemon-reload
	# The software goes once no unit uses it.
	if ! compgen -G "$unit_dir/tandem-*.service" >/dev/null; then
		rm -rf "$opt/venv"
	fi
	if ((purge)); then
		rm -rf "$etc" "$opt"
		if [[ -z $root ]] && getent passwd "$user" >/dev/null; then
			userdel "$user"
		fi
		echo "purged /etc/tandem, /opt/tandem and the services' state"
	else
		echo "kept /etc/tandem and /opt/tandem/models (--purge removes them)"
	fi
}

make_user() {
	[[ -z $root ]] || return 0
	if ! getent passwd "$user" >/dev/null; then
		useradd --system --user-group --home-dir /nonexistent --no-create-home \
			--shell /usr/sbin/nologin --comment "Tandem speculative decoding" "$user"
		echo "created system user $user"
	fi
}

make_venv() {
	((make_venv)) || return 0
	local src=${source_path:-$(dirname "$here")}
	[[ -e $src ]] || die "--source $src does not exist"
	if [[ -d $src && ! -f $src/pyproject.toml ]]; then
		die "--source $src has no pyproject.toml: give the Tandem source directory or a wheel"
	fi
	command -v "$python" >/dev/null || die "no Python interpreter '$python' (see --python)"
	"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
		die "$python is older than Python 3.11"
	mkdir -p "$opt"
	[[ -x $opt/venv/bin/python ]] || "$python" -m venv "$opt/venv"
	local pip=("$opt/venv/bin/python" -m pip install)
	if [[ -n $torch_index ]]; then
		"${pip[@]}" --index-url "$torch_index" "$torch_spec"
	else
		"${pip[@]}" "$torch_spec"
	fi
	"${pip[@]}" "$src"
	echo "installed Tandem into $opt/venv"
}

write_config() {
	install -d -m 0755 "$opt"
	install -d -m 0755 "$opt/models"
	install -d -m 0750 "$etc"
	set_owner "$etc"
	local name
	for name in "${units[@]}"; do
		if [[ ! -e $etc/$name.env ]]; then
			install -m 0640 "$here/env/$name.env" "$etc/$name.env"
			set_owner "$etc/$name.env"
			echo "wrote $etc/$name.env: edit it (models, addresses)"
		fi
	done
	if [[ ! -e $etc/token ]]; then
		# 256 random bits as hex, created unreadable to others from the first byte.
		(
			umask 0077
			head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$etc/token"
			echo >>"$etc/token"
		)
		chmod 0640 "$etc/token"
		set_owner "$etc/token"
		echo "wrote $etc/token: copy this same file to every Tandem machine"
	fi
}

install_units() {
	install -d -m 0755 "$unit_dir"
	local name
	for name in "${units[@]}"; do
		install -m 0644 "$here/tandem-$name.service" "$unit_dir/tandem-$name.service"
	done
	[[ -n $root ]] || systemctl daemon-reload
	for name in "${units[@]}"; do
		sysctl enable "tandem-$name.service"
		if ((start_now)); then
			systemctl restart "tandem-$name.service"
		fi
	done
}

if ((uninstall)); then
	do_uninstall
	exit 0
fi
((${#units[@]} > 0)) || die "choose what this machine runs with --role draft|target|coordinator (see --help)"
make_user
make_venv
write_config
install_units
if ((start_now == 0)); then
	echo "enabled; after editing /etc/tandem/*.env start with: systemctl start ${units[*]/#/tandem-}"
fi
