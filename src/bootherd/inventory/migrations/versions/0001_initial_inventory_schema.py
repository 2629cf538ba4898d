"""initial inventory schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 09:40:53.578583
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('generation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('groups',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('gid', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('name'),
    sa.UniqueConstraint('gid')
    )
    op.create_table('leases',
    sa.Column('ip', sa.String(length=45), nullable=False),
    sa.Column('mac', sa.String(length=17), nullable=False),
    sa.Column('client_id', sa.String(length=255), server_default='', nullable=False),
    sa.Column('node_id', sa.String(length=64), nullable=True),
    sa.Column('state', sa.String(length=16), server_default='bound', nullable=False),
    sa.Column('expires', sa.Float(), nullable=False),
    sa.Column('updated', sa.Float(), nullable=False),
    sa.Column('server', sa.String(length=64), server_default='', nullable=False),
    sa.PrimaryKeyConstraint('ip')
    )
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_mac', ['mac'], unique=False)

    op.create_table('mounts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('pid', sa.String(length=64), nullable=False),
    sa.Column('eid', sa.String(length=64), nullable=False),
    sa.Column('fstype', sa.String(length=16), server_default='NFS', nullable=False),
    sa.Column('remote', sa.String(length=255), nullable=False),
    sa.Column('local', sa.String(length=255), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('node_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), server_default='', nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('node_events', schema=None) as batch_op:
        batch_op.create_index('ix_node_events_node', ['node_id', 'ts'], unique=False)

    op.create_table('node_states',
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('since', sa.Float(), nullable=False),
    sa.Column('source', sa.String(length=16), server_default='', nullable=False),
    sa.PrimaryKeyConstraint('node_id')
    )
    op.create_table('node_types',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('class', sa.String(length=32), server_default='pc', nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('loader_bios', sa.String(length=255), server_default='', nullable=False),
    sa.Column('loader_uefi', sa.String(length=255), server_default='', nullable=False),
    sa.Column('loader_http', sa.String(length=255), server_default='', nullable=False),
    sa.Column('loader_ipxe', sa.String(length=255), server_default='', nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('ntp_servers',
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=8), server_default='server', nullable=False),
    sa.PrimaryKeyConstraint('host')
    )
    op.create_table('os_images',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('partition', sa.Integer(), nullable=True),
    sa.Column('sysid', sa.Integer(), nullable=True),
    sa.Column('path', sa.String(length=255), server_default='', nullable=False),
    sa.Column('initrd', sa.String(length=255), server_default='', nullable=False),
    sa.Column('cmdline', sa.Text(), server_default='', nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('rpms',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('pid', sa.String(length=64), nullable=False),
    sa.Column('eid', sa.String(length=64), nullable=False),
    sa.Column('vname', sa.String(length=64), server_default='', nullable=False),
    sa.Column('path', sa.String(length=255), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('servers',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('roles', sa.String(length=255), server_default='', nullable=False),
    sa.Column('address', sa.String(length=45), server_default='', nullable=False),
    sa.Column('started', sa.Float(), nullable=False),
    sa.Column('heartbeat', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('tarballs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('pid', sa.String(length=64), nullable=False),
    sa.Column('eid', sa.String(length=64), nullable=False),
    sa.Column('vname', sa.String(length=64), server_default='', nullable=False),
    sa.Column('dir', sa.String(length=255), nullable=False),
    sa.Column('path', sa.String(length=255), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('users',
    sa.Column('login', sa.String(length=64), nullable=False),
    sa.Column('uid', sa.Integer(), nullable=False),
    sa.Column('gid', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), server_default='', nullable=False),
    sa.Column('email', sa.String(length=255), server_default='', nullable=False),
    sa.Column('shell', sa.String(length=64), server_default='/bin/sh', nullable=False),
    sa.Column('password_hash', sa.String(length=255), server_default='*', nullable=False),
    sa.Column('serial', sa.Integer(), server_default='1', nullable=False),
    sa.PrimaryKeyConstraint('login'),
    sa.UniqueConstraint('uid')
    )
    op.create_table('experiment_members',
    sa.Column('pid', sa.String(length=64), nullable=False),
    sa.Column('eid', sa.String(length=64), nullable=False),
    sa.Column('login', sa.String(length=64), nullable=False),
    sa.Column('root', sa.Boolean(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['login'], ['users.login'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pid', 'eid', 'login')
    )
    op.create_table('experiments',
    sa.Column('pid', sa.String(length=64), nullable=False),
    sa.Column('eid', sa.String(length=64), nullable=False),
    sa.Column('creator', sa.String(length=64), nullable=False),
    sa.Column('swapper', sa.String(length=64), nullable=False),
    sa.Column('routertype', sa.String(length=16), server_default='none', nullable=False),
    sa.Column('nseconfig', sa.Text(), server_default='', nullable=False),
    sa.Column('startupcmd', sa.Text(), server_default='', nullable=False),
    sa.Column('gid', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['creator'], ['users.login'], ),
    sa.ForeignKeyConstraint(['gid'], ['groups.name'], ),
    sa.ForeignKeyConstraint(['swapper'], ['users.login'], ),
    sa.PrimaryKeyConstraint('pid', 'eid')
    )
    op.create_table('nodes',
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=32), server_default='testnode', nullable=False),
    sa.Column('phys_node_id', sa.String(length=64), nullable=True),
    sa.Column('jailed', sa.Boolean(), server_default='0', nullable=False),
    sa.Column('default_os', sa.String(length=128), nullable=True),
    sa.Column('temp_os', sa.String(length=128), nullable=True),
    sa.Column('next_os', sa.String(length=128), nullable=True),
    sa.Column('loader_bios', sa.String(length=255), server_default='', nullable=False),
    sa.Column('loader_uefi', sa.String(length=255), server_default='', nullable=False),
    sa.Column('loader_http', sa.String(length=255), server_default='', nullable=False),
    sa.Column('loader_ipxe', sa.String(length=255), server_default='', nullable=False),
    sa.Column('pxe_loader', sa.String(length=255), server_default='', nullable=False),
    sa.Column('boot_cmdline', sa.Text(), server_default='', nullable=False),
    sa.Column('bios_disk', sa.Integer(), nullable=True),
    sa.Column('privkey', sa.String(length=128), nullable=True),
    sa.Column('ntp_drift', sa.Float(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['default_os'], ['os_images.name'], ),
    sa.ForeignKeyConstraint(['next_os'], ['os_images.name'], ),
    sa.ForeignKeyConstraint(['phys_node_id'], ['nodes.node_id'], ),
    sa.ForeignKeyConstraint(['temp_os'], ['os_images.name'], ),
    sa.ForeignKeyConstraint(['type'], ['node_types.name'], ),
    sa.PrimaryKeyConstraint('node_id')
    )
    op.create_table('ssh_keys',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('login', sa.String(length=64), nullable=False),
    sa.Column('key', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['login'], ['users.login'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('user_groups',
    sa.Column('login', sa.String(length=64), nullable=False),
    sa.Column('group_name', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['group_name'], ['groups.name'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['login'], ['users.login'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('login', 'group_name')
    )
    op.create_table('allocations',
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('pid', sa.String(length=64), nullable=False),
    sa.Column('eid', sa.String(length=64), nullable=False),
    sa.Column('vname', sa.String(length=64), nullable=False),
    sa.Column('startupcmd', sa.Text(), server_default='', nullable=False),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.node_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('node_id'),
    sa.UniqueConstraint('pid', 'eid', 'vname', name='uq_allocation_vname')
    )
    op.create_table('interfaces',
    sa.Column('mac', sa.String(length=17), nullable=False),
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('ip', sa.String(length=45), nullable=True),
    sa.Column('mask', sa.String(length=45), server_default='', nullable=False),
    sa.Column('role', sa.String(length=8), server_default='expt', nullable=False),
    sa.Column('iface', sa.String(length=32), server_default='', nullable=False),
    sa.Column('speed', sa.Integer(), server_default='1000', nullable=False),
    sa.Column('duplex', sa.String(length=8), server_default='full', nullable=False),
    sa.Column('lan', sa.String(length=64), server_default='', nullable=False),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.node_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('mac'),
    sa.UniqueConstraint('ip')
    )
    with op.batch_alter_table('interfaces', schema=None) as batch_op:
        batch_op.create_index('ix_interfaces_node', ['node_id'], unique=False)

    op.create_table('link_delays',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('linkname', sa.String(length=64), nullable=False),
    sa.Column('int0', sa.String(length=17), nullable=False),
    sa.Column('int1', sa.String(length=17), nullable=False),
    sa.Column('pipe0', sa.Integer(), nullable=False),
    sa.Column('delay0', sa.Float(), server_default='0', nullable=False),
    sa.Column('bw0', sa.Integer(), server_default='100000', nullable=False),
    sa.Column('plr0', sa.Float(), server_default='0', nullable=False),
    sa.Column('pipe1', sa.Integer(), nullable=False),
    sa.Column('delay1', sa.Float(), server_default='0', nullable=False),
    sa.Column('bw1', sa.Integer(), server_default='100000', nullable=False),
    sa.Column('plr1', sa.Float(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.node_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('routes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('dest', sa.String(length=45), nullable=False),
    sa.Column('desttype', sa.String(length=8), server_default='net', nullable=False),
    sa.Column('destmask', sa.String(length=45), server_default='255.255.255.0', nullable=False),
    sa.Column('nexthop', sa.String(length=45), nullable=False),
    sa.Column('cost', sa.Integer(), server_default='1', nullable=False),
    sa.Column('src', sa.String(length=45), server_default='', nullable=False),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.node_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('trafgens',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('myname', sa.String(length=64), nullable=False),
    sa.Column('myport', sa.Integer(), nullable=False),
    sa.Column('peername', sa.String(length=64), nullable=False),
    sa.Column('peerport', sa.Integer(), nullable=False),
    sa.Column('proto', sa.String(length=8), server_default='udp', nullable=False),
    sa.Column('role', sa.String(length=8), server_default='source', nullable=False),
    sa.Column('generator', sa.String(length=32), server_default='TG', nullable=False),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.node_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('tunnels',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('lan', sa.String(length=64), nullable=False),
    sa.Column('member', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), server_default='', nullable=False),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.node_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('tunnels')
    op.drop_table('trafgens')
    op.drop_table('routes')
    op.drop_table('link_delays')
    with op.batch_alter_table('interfaces', schema=None) as batch_op:
        batch_op.drop_index('ix_interfaces_node')

    op.drop_table('interfaces')
    op.drop_table('allocations')
    op.drop_table('user_groups')
    op.drop_table('ssh_keys')
    op.drop_table('nodes')
    op.drop_table('experiments')
    op.drop_table('experiment_members')
    op.drop_table('users')
    op.drop_table('tarballs')
    op.drop_table('servers')
    op.drop_table('rpms')
    op.drop_table('os_images')
    op.drop_table('ntp_servers')
    op.drop_table('node_types')
    op.drop_table('node_states')
    with op.batch_alter_table('node_events', schema=None) as batch_op:
        batch_op.drop_index('ix_node_events_node')

    op.drop_table('node_events')
    op.drop_table('mounts')
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index('ix_leases_mac')

    op.drop_table('leases')
    op.drop_table('groups')
    op.drop_table('generation')
