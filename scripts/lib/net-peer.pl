#!/usr/bin/perl
# A TCP peer outside the QEMU test bed for scripts/test-nested-net: it runs on the machine that
# runs QEMU, in the network namespace the script made, and reaches the guest through QEMU's NIC
# and the test-bed kernel's forwarding. Its connection must outlive the test-bed kernel (a kexec).
#
# Usage: net-peer.pl LOG HOST PORT
# Follows the test bed's serial log LOG. On "NET-E2E X: peer go" it connects to HOST:PORT once
# (never again) and writes 8 KiB of deterministic bytes every 50 ms; on "NET-E2E X: peer stop"
# it half-closes, waits for the guest to close, and prints
#   X-PEER sent=<bytes> md5=<hex> at_kexec=<bytes> at_restore=<bytes>
# (bytes written when the log showed the kexec starting and the restore starting). Any error
# (connect, write, reset, timeout) prints "X-PEER FAIL: <why>" and exits 1.
use strict;
use warnings;
use Digest::MD5;
use IO::Socket::INET;
use Socket qw(IPPROTO_TCP SHUT_WR);
use Time::HiRes qw(sleep time);

my ($log, $host, $port) = @ARGV;
die "usage: net-peer.pl LOG HOST PORT\n" unless defined $port;
$| = 1;

sub fail {
    print "X-PEER FAIL: @_\n";
    exit 1;
}

# The log, read as it grows: the markers seen so far.
my ($log_fh, $partial, %seen) = (undef, '');
my %markers = (
    go      => 'NET-E2E X: peer go',
    kexec   => 'NET-E2E K: live update across the kexec',
    restore => 'NET-E2E restore at',
    stop    => 'NET-E2E X: peer stop',
);

sub poll_log {
    unless ($log_fh) {
        open($log_fh, '<', $log) or return;
    }
    my $n;
    while (($n = sysread($log_fh, my $buf, 65536)) && $n > 0) {
        $partial .= $buf;
    }
    while ($partial =~ s/^([^\n]*)\n//) {
        my $line = $1;
        for my $m (keys %markers) {
            $seen{$m} //= 1 if index($line, $markers{$m}) >= 0;
        }
    }
}

my $start = time;
until ($seen{go}) {
    fail("no '$markers{go}' in $log within 1800 s") if time - $start > 1800;
    sleep 0.2;
    poll_log();
}

my $sock;
my $connect_start = time;
until ($sock = IO::Socket::INET->new(PeerAddr => $host, PeerPort => $port, Proto => 'tcp',
        Timeout => 5)) {
    fail("cannot connect to $host:$port within 30 s: $@") if time - $connect_start > 30;
    sleep 0.5;
}
# Retransmit at least once a second (TCP_RTO_MAX_MS, Linux 6.15 and later), so the stream
# resumes within a second of the route coming back rather than after an exponential backoff
# as long as the outage; without it the test still passes, only later.
# With retransmissions that frequent, the default retry count would give up within seconds:
# TCP_USER_TIMEOUT keeps the connection through an outage of up to 10 minutes.
my ($TCP_USER_TIMEOUT, $TCP_RTO_MAX_MS) = (18, 44);
setsockopt($sock, IPPROTO_TCP, $TCP_USER_TIMEOUT, 600_000) or fail("TCP_USER_TIMEOUT: $!");
my $rto = setsockopt($sock, IPPROTO_TCP, $TCP_RTO_MAX_MS, 1000) ? "1000 ms" : "default ($!)";
print "X-PEER connected to $host:$port (retransmission interval at most $rto)\n";

my $md5 = Digest::MD5->new;
my ($sent, $counter, %at) = (0, 0);
until ($seen{stop}) {
    # 8 KiB from a counter: every chunk differs, and a lost or repeated one changes the md5.
    my $chunk = pack('N*', map { $counter * 2048 + $_ } 0 .. 2047);
    $counter++;
    my $off = 0;
    while ($off < length $chunk) {
        my $w = syswrite($sock, $chunk, length($chunk) - $off, $off);
        fail("write after $sent bytes: $!") unless defined $w;
        $off += $w;
    }
    $md5->add($chunk);
    $sent += length $chunk;
    poll_log();
    for my $m (qw(kexec restore)) {
        $at{$m} //= $sent if $seen{$m};
    }
    sleep 0.05;
}
shutdown($sock, SHUT_WR) or fail("shutdown: $!");
# The guest's nc exits once it has read our FIN; its close is our EOF.
my $eof_start = time;
$sock->blocking(0);
while (1) {
    my $r = sysread($sock, my $buf, 4096);
    last if defined $r && $r == 0;
    fail("reading the guest's close: $!") if !defined $r && !$!{EAGAIN};
    fail("the guest did not close within 120 s of our FIN") if time - $eof_start > 120;
    sleep 0.1;
}
printf "X-PEER sent=%d md5=%s at_kexec=%s at_restore=%s\n", $sent, $md5->hexdigest,
    $at{kexec} // 'none', $at{restore} // 'none';
