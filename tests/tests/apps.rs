//! Real HPC applications, checkpointed when Slurm requeues or preempts their
//! job and restored on the requeued run: Debian sid's LAMMPS and GROMACS,
//! linked with Open MPI, NWChem linked with MPICH under `srun --mpi=pmi2`,
//! and AutoDock Vina, in the application SIF (`cluster/apps.sh`). The
//! measure is the program's state: the run goes on from the saved step and
//! prints what an uninterrupted run of the same input prints, every step
//! exactly once, in the same output files.
//!
//! Each test runs its uninterrupted reference as a second protected job
//! (root-started Apptainer mounts the SIF; an unprotected run would unpack
//! all 600 MB of it first, there being no squashfuse on the nodes), on the
//! node the restore does not go to: containers share the node's PID and
//! network namespaces, and the reference would hold the very pids and ports
//! the checkpoint needs (both nodes' pid sequences run in step).

use cluster_tests::{cluster, BatchJob, Cluster};
use std::sync::OnceLock;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

/// LAMMPS' Lennard-Jones melt, the package's `examples/melt/in.melt` (kept
/// in the SIF), scaled to 6912 atoms and 3000 steps (~12 s on one core),
/// thermo output every 100 steps, flushed so that progress shows.
const LMP_STEPS: u32 = 3000;
const LMP_THERMO: u32 = 100;

fn lammps_input(c: &Cluster) -> &'static str {
    static INPUT: OnceLock<String> = OnceLock::new();
    INPUT.get_or_init(|| {
        let sif = c.apps_sif();
        let melt =
            c.exec("node1", "alice", &["srun", "--checkpoint-container", "apptainer", "-s", "exec", sif, "cat", "/opt/apps/in.melt"]).ok();
        let mut scaled = Vec::new();
        for line in melt.stdout.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("region") => scaled.push("region          box block 0 12 0 12 0 12".to_string()),
                Some("thermo") => {
                    scaled.push(format!("thermo          {LMP_THERMO}"));
                    scaled.push("thermo_modify   flush yes".into());
                }
                Some("run") => scaled.push(format!("run             {LMP_STEPS}")),
                _ => scaled.push(line.to_string()),
            }
        }
        assert_eq!(scaled.iter().filter(|l| l.contains(&LMP_STEPS.to_string())).count(), 1, "in.melt changed:\n{}", melt.stdout);
        scaled.join("\n") + "\n"
    })
}

/// LAMMPS thermo rows (Step Temp E_pair E_mol TotEng Press) in `text`.
fn thermo_rows(text: &str) -> Vec<(u32, String)> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let numeric = words.len() == 6 && words[1..].iter().all(|w| w.parse::<f64>().is_ok());
            Some((words.first()?.parse().ok().filter(|_| numeric)?, words.join(" ")))
        })
        .collect()
}

/// Every thermo step of the run, each exactly once, in order.
#[track_caller]
fn assert_every_thermo_step_once(rows: &[(u32, String)], what: &str, job: &BatchJob) {
    let steps: Vec<u32> = rows.iter().map(|r| r.0).collect();
    let expected: Vec<u32> = (0..=LMP_STEPS).step_by(LMP_THERMO as usize).collect();
    assert_eq!(steps, expected, "thermo steps in {what}; job output:\n{}", job.output());
}

/// A job running LAMMPS on the scaled melt in its directory (the cwd is
/// bound into the container); `lmp` is the command line inside.
fn lammps_job(c: &Cluster, sbatch_args: &[&str], lmp: &str) -> BatchJob {
    let sif = c.apps_sif();
    let input = lammps_input(c);
    let setup = format!("cat > in.melt <<'EOF'\n{input}EOF");
    c.submit_job(sbatch_args, Some(&setup), |dir| (format!("cd {dir}\nsrun apptainer -s exec {sif} {lmp}"), 0, 0))
}

fn wait_until(job: &BatchJob, progressed: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + 2 * MINUTE;
    while !progressed() {
        assert!(std::time::Instant::now() < deadline, "no progress; job output:\n{}", job.output());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn requeue_when(c: &Cluster, job: &BatchJob, progressed: impl Fn() -> bool) {
    wait_until(job, progressed);
    c.exec("ctl", "root", &["scontrol", "requeue", &job.id.to_string()]).ok();
    c.wait_state(job.id, &["PENDING"], MINUTE);
}

/// The job checkpointed once, restored once, and completed.
#[track_caller]
fn assert_restored_once(c: &Cluster, job: &BatchJob, node: &str) {
    assert_restored_once_as(c, job, node, TASK_0);
}

/// How the lines name task 0 of a step, and the ranks of an `srun
/// --mpi=pmi2 -n 2` step, which run in one container.
const TASK_0: &str = "checkpointed task 0 of step ";
const TWO_RANKS: &str = ".0 (2 ranks in one container) (";

/// The same, where the line that says it was checkpointed has `named`.
#[track_caller]
fn assert_restored_once_as(c: &Cluster, job: &BatchJob, node: &str, named: &str) {
    assert_eq!(c.wait_job(job.id, 3 * MINUTE), "COMPLETED", "{}", job.output());
    let out = job.output();
    assert!(out.contains(&format!("run restart=1 on {node}")), "{out}");
    let checkpointed = out.lines().filter(|l| l.contains("checkpoint-container: checkpointed ") && l.contains(named));
    assert_eq!(checkpointed.count(), 1, "{out}");
    assert_eq!(out.matches("checkpoint-container: restored process").count(), 1, "not restored:\n{out}");
}

/// The node the reference runs on when the restore goes to `node`.
fn elsewhere(node: &str) -> &'static str {
    if node == "node1" {
        "node2"
    } else {
        "node1"
    }
}

fn lammps_serial_requeued_then_restored_on(node: &str) {
    let c = cluster();
    let lmp = "lmp -in in.melt -log log.lammps";
    let job = lammps_job(c, &["-w", "node1"], lmp);
    let reference = lammps_job(c, &["-w", elsewhere(node)], lmp);
    requeue_when(c, &job, || thermo_rows(&job.lines("log.lammps").join("\n")).len() >= 8);
    c.release(job.id, Some(node));
    assert_restored_once(c, &job, node);
    assert_eq!(c.wait_job(reference.id, 3 * MINUTE), "COMPLETED", "{}", reference.output());
    let expected = thermo_rows(&reference.output());
    assert_every_thermo_step_once(&expected, "the reference's output", &reference);
    // The log file LAMMPS writes itself, and its stdout: srun's pipe to the
    // job's output file, continued across the checkpoint.
    for (what, text) in [("log.lammps", job.lines("log.lammps").join("\n")), ("job.out", job.output())] {
        let rows = thermo_rows(&text);
        assert_every_thermo_step_once(&rows, what, &job);
        // Serial LAMMPS is bit-reproducible: the same numbers, to the digit.
        assert_eq!(rows, expected, "{what} differs from an uninterrupted run");
    }
    job.cleanup(c);
    reference.cleanup(c);
}

#[test]
fn lammps_requeued_restores_on_the_same_node_with_the_uninterrupted_output() {
    lammps_serial_requeued_then_restored_on("node1");
}

/// Fails until node-local /dev/shm files are saved: Open MPI maps a
/// shared-memory segment there even for one rank (`Can't open file
/// dev/shm/sm_segment.node1…` on node2, and the job starts over).
#[test]
fn lammps_requeued_restores_on_the_other_node_with_the_uninterrupted_output() {
    lammps_serial_requeued_then_restored_on("node2");
}

/// Two ranks under `mpirun` in one container (one Slurm task), preempted on
/// node1 and restored on node2. Fails until loopback TCP (PRRTE/PMIx) and
/// the ranks' /dev/shm segments are checkpointed. Two-rank output is not
/// bit-reproducible (reduction order), so the run is compared by progress
/// and by its conserved energy (NVE).
#[test]
fn lammps_two_ranks_under_mpirun_preempted_restore_on_the_other_node() {
    let c = cluster();
    let lmp = "mpirun -np 2 --map-by :OVERSUBSCRIBE lmp -in in.melt -log log.lammps";
    let job = lammps_job(c, &["-w", "node1", "-c", "2"], lmp);
    let reference = lammps_job(c, &["-w", "node1", "-c", "2"], lmp);
    wait_until(&job, || thermo_rows(&job.lines("log.lammps").join("\n")).len() >= 8);
    let high = c.sbatch("bob", &["-p", "high", "-w", "node1", "-c", "2"], "#!/bin/bash\nsleep 1\n");
    assert_eq!(c.wait_job(high, 2 * MINUTE), "COMPLETED");
    c.release(job.id, Some("node2"));
    assert_restored_once(c, &job, "node2");
    assert_eq!(c.wait_job(reference.id, 3 * MINUTE), "COMPLETED", "{}", reference.output());
    let total_energy = |rows: &[(u32, String)]| -> f64 { rows.last().unwrap().1.split(' ').nth(4).unwrap().parse().unwrap() };
    let expected = total_energy(&thermo_rows(&reference.output()));
    for (what, text) in [("log.lammps", job.lines("log.lammps").join("\n")), ("job.out", job.output())] {
        let rows = thermo_rows(&text);
        assert_every_thermo_step_once(&rows, what, &job);
        let energy = total_energy(&rows);
        assert!((energy - expected).abs() < 0.01 * expected.abs(), "{what}: final TotEng {energy}, uninterrupted {expected}");
    }
    job.cleanup(c);
    reference.cleanup(c);
}

/// MD steps, energies logged every `GMX_LOG` steps.
const GMX_STEPS: u32 = 2500;
const GMX_LOG: u32 = 100;

/// A 3 nm box of SPC/E water (884 molecules, from GROMACS' own spc216.gro
/// and OPLS-AA files), energy-minimised, ready for `GMX_STEPS` of MD with
/// PME, v-rescale and a fixed seed: `md.tpr` in a directory of alice's,
/// made once per recipe (kept in /shared, named by the recipe's hash). `mdrun -reprod` on one core then gives the same
/// energies to the digit, run after run.
fn gromacs_input(c: &Cluster) -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        let sif = c.apps_sif();
        let prepare = format!(
            r#"set -e
cat > em.mdp <<EOF
integrator = steep
nsteps = 500
cutoff-scheme = Verlet
coulombtype = PME
rcoulomb = 1.0
rvdw = 1.0
EOF
cat > md.mdp <<EOF
integrator = md
dt = 0.002
nsteps = {GMX_STEPS}
nstlog = {GMX_LOG}
nstenergy = {GMX_LOG}
nstcalcenergy = {GMX_LOG}
cutoff-scheme = Verlet
coulombtype = PME
rcoulomb = 1.0
rvdw = 1.0
tcoupl = v-rescale
tc-grps = System
tau-t = 0.1
ref-t = 300
ld-seed = 1
gen-vel = yes
gen-temp = 300
gen-seed = 1
constraints = h-bonds
EOF
cat > prepare.sh <<'EOF'
set -e
gmx -quiet solvate -cs spc216.gro -box 3 3 3 -o water.gro
printf '#include "oplsaa.ff/forcefield.itp"\n#include "oplsaa.ff/spce.itp"\n[ system ]\nwater\n[ molecules ]\nSOL %d\n' $(( $(sed -n 2p water.gro) / 3 )) > topol.top
gmx -quiet grompp -f em.mdp -c water.gro -p topol.top -o em.tpr
gmx -quiet mdrun -s em.tpr -deffnm em -nt 1
gmx -quiet grompp -f md.mdp -c em.gro -p topol.top -o md.tpr
EOF
srun --checkpoint-container -w node1 apptainer -s exec {sif} bash prepare.sh > prepare.log 2>&1 || {{ cat prepare.log; exit 1; }}
"#
        );
        let mut recipe = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&prepare, &mut recipe);
        let dir = format!("/shared/gmx-input-{:016x}", std::hash::Hasher::finish(&recipe));
        c.sh("node1", "root", &format!("install -d -o alice -g alice {dir}")).ok();
        c.sh("node1", "alice", &format!("cd {dir} && {{ [ -s md.tpr ] || {{ {prepare}\n}}; }}")).ok();
        dir
    })
}

/// md.log from the first energies to the run's averages, without the lines
/// that carry a date.
fn gromacs_energies(md_log: &[String]) -> Vec<String> {
    let start = md_log.iter().position(|l| l.trim_start().starts_with("Step           Time")).unwrap_or(md_log.len());
    let end = md_log.iter().position(|l| l.contains("M E G A - F L O P S")).unwrap_or(md_log.len());
    md_log[start..end.max(start)].iter().filter(|l| !l.starts_with("Writing checkpoint")).cloned().collect()
}

/// The steps whose energies md.log holds, in order.
fn gromacs_steps(md_log: &[String]) -> Vec<u32> {
    md_log
        .windows(2)
        .filter(|w| w[0].trim_start().starts_with("Step           Time"))
        .filter_map(|w| w[1].split_whitespace().next()?.parse().ok())
        .collect()
}

fn gromacs_requeued_then_restored_on_node2(mdrun: &str) {
    let c = cluster();
    let sif = c.apps_sif();
    let input = gromacs_input(c);
    let submit = |node: &str| {
        let setup = format!("cp {input}/md.tpr .");
        c.submit_job(&["-w", node], Some(&setup), |dir| {
            (format!("cd {dir}\nsrun apptainer -s exec {sif} {mdrun} -s md.tpr -deffnm md -reprod"), 0, 0)
        })
    };
    let job = submit("node1");
    let reference = submit("node1");
    requeue_when(c, &job, || gromacs_steps(&job.lines("md.log")).len() >= 6);
    c.release(job.id, Some("node2"));
    assert_restored_once(c, &job, "node2");
    assert_eq!(c.wait_job(reference.id, 3 * MINUTE), "COMPLETED", "{}", reference.output());
    let expected: Vec<u32> = (0..=GMX_STEPS).step_by(GMX_LOG as usize).collect();
    assert_eq!(gromacs_steps(&reference.lines("md.log")), expected, "reference md.log");
    assert_eq!(gromacs_steps(&job.lines("md.log")), expected, "md.log: every step once; job output:\n{}", job.output());
    assert_eq!(
        gromacs_energies(&job.lines("md.log")),
        gromacs_energies(&reference.lines("md.log")),
        "energies differ from an uninterrupted run"
    );
    job.cleanup(c);
    reference.cleanup(c);
}

/// `gmx` is GROMACS' thread-MPI build: no Open MPI at run time.
#[test]
fn gromacs_thread_mpi_requeued_restores_on_the_other_node_with_identical_energies() {
    gromacs_requeued_then_restored_on_node2("gmx mdrun -nt 1");
}

/// `gmx_mpi` is the Open MPI build (one rank, no mpirun). Fails until
/// node-local /dev/shm files are saved (Open MPI's shared-memory segment).
#[test]
fn gromacs_open_mpi_requeued_restores_on_the_other_node_with_identical_energies() {
    gromacs_requeued_then_restored_on_node2("gmx_mpi mdrun -ntomp 1");
}

/// AutoDock Vina (`vina --config conf.txt`: the protein, ligand and search
/// box of Debian's own autodock-vina package test, kept in the SIF), two
/// Monte Carlo runs, seed fixed, one CPU: the same poses and affinities,
/// run after run.
const VINA: &str = "vina --config conf.txt --cpu 1 --seed 42 --exhaustiveness 2";
/// Vina's progress bar: 51 stars, printed as the search goes (they reach
/// the job's file only with the bar's newline: slurmstepd forwards a
/// task's output by lines).
const VINA_STARS: usize = 51;
/// How long the search runs before the requeue: about a third of it.
const VINA_SEARCH_BEFORE_REQUEUE: Duration = Duration::from_secs(12);

/// The stars of Vina's progress bar in `text`: the stars each line starts
/// with, from the bar's scale (`|----|…`) to the result table. Lines of
/// Slurm and of the checkpoint may have landed amid the bar.
fn vina_stars(text: &str) -> usize {
    let bar = text.split_once("|----|").map_or("", |(_, rest)| rest);
    let bar = bar.split_once("mode |").map_or(bar, |(bar, _)| bar);
    bar.lines().skip(1).map(|l| l.len() - l.trim_start_matches('*').len()).sum()
}

/// The result table: one line per pose (mode, affinity, RMSDs).
fn vina_poses(text: &str) -> Vec<String> {
    let table = text.split_once("-----+------------+----------+----------").map_or("", |(_, rest)| rest);
    table.lines().skip(1).map(str::trim).take_while(|l| l.split_whitespace().count() == 4).map(str::to_string).collect()
}

/// Docking requeued a third of the way through on node1, finished on
/// node2: each star once in the job's output, and the uninterrupted run's
/// poses, to the digit, in the table and in out.pdbqt.
#[test]
fn autodock_vina_requeued_restores_on_the_other_node_with_the_same_poses() {
    let c = cluster();
    let sif = c.apps_sif();
    let submit = |node: &str| {
        let setup = format!("srun --checkpoint-container -w node1 apptainer -s exec {sif} sh -c 'cp /opt/apps/vina/* .'");
        c.submit_job(&["-w", node], Some(&setup), |dir| (format!("cd {dir}\nsrun apptainer -s exec {sif} {VINA}"), 0, 0))
    };
    let job = submit("node1");
    let reference = submit("node1");
    let searching_since = std::cell::Cell::new(None);
    requeue_when(c, &job, || {
        if !job.output().contains("Performing docking") {
            return false;
        }
        let since = searching_since.get().unwrap_or_else(std::time::Instant::now);
        searching_since.set(Some(since));
        since.elapsed() > VINA_SEARCH_BEFORE_REQUEUE
    });
    c.release(job.id, Some("node2"));
    assert_restored_once(c, &job, "node2");
    assert_eq!(c.wait_job(reference.id, 3 * MINUTE), "COMPLETED", "{}", reference.output());
    let expected = vina_poses(&reference.output());
    assert!(expected.len() >= 5, "the reference docked nothing:\n{}", reference.output());
    assert_eq!(vina_stars(&job.output()), VINA_STARS, "each step of the search once; job output:\n{}", job.output());
    assert_eq!(vina_poses(&job.output()), expected, "poses differ from an uninterrupted run");
    assert_eq!(job.lines("out.pdbqt"), reference.lines("out.pdbqt"), "out.pdbqt differs from an uninterrupted run");
    job.cleanup(c);
    reference.cleanup(c);
}

/// NWChem, built with MPICH: the MPI that Slurm can launch here (Debian's
/// Slurm has only the `pmi2` plugin; Open MPI needs `pmix`).
const NWCHEM: &str = "nwchem.mpich dimer.nw";

fn nwchem_energies(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.contains("Total DFT energy =")).collect()
}

fn nwchem_job(c: &Cluster, sbatch_args: &[&str], srun_args: &str, nwchem: &str) -> BatchJob {
    let sif = c.apps_sif();
    // Copied out by a protected container: unprotected, Apptainer would
    // first unpack the whole SIF (no squashfuse on the nodes).
    let setup = format!("srun --checkpoint-container -w node1 apptainer -s exec {sif} cp /opt/apps/nwchem/dimer.nw .");
    c.submit_job(sbatch_args, Some(&setup), |dir| (format!("cd {dir}\nsrun {srun_args} apptainer -s exec {sif} {nwchem}"), 0, 0))
}

/// Runs `nwchem` (after `srun SRUN_ARGS`, in a job of `sbatch_args`)
/// twice on node1: one run requeued once it printed `energies_first`
/// energies and restored on node2, then one uninterrupted. Both converge; returns their outputs.
fn nwchem_requeued_and_uninterrupted(
    c: &Cluster,
    sbatch_args: &[&str],
    srun_args: &str,
    nwchem: &str,
    energies_first: usize,
    named: &str,
) -> (String, String) {
    let sbatch_args = [&["-w", "node1"], sbatch_args].concat();
    let job = nwchem_job(c, &sbatch_args, srun_args, nwchem);
    requeue_when(c, &job, || nwchem_energies(&job.output()).len() >= energies_first);
    c.release(job.id, Some("node2"));
    assert_restored_once_as(c, &job, "node2", named);
    // Then, alone: MPI ranks poll busily, and the two nodes share this
    // machine's cores (ranks of two jobs on one core slowed a restored run
    // past the test's patience).
    let reference = nwchem_job(c, &sbatch_args, srun_args, nwchem);
    assert_eq!(c.wait_job(reference.id, 3 * MINUTE), "COMPLETED", "{}", reference.output());
    let (out, expected) = (job.output(), reference.output());
    assert!(expected.contains("Optimization converged") && out.contains("Optimization converged"), "{out}");
    job.cleanup(c);
    reference.cleanup(c);
    (out, expected)
}

/// A one-rank `srun --mpi=pmi2` step of an MPICH program: its PMI socket to
/// slurmstepd is carried across the checkpoint (helper/src/pmi.rs), so the
/// restored NWChem's MPI_Finalize (a PMI barrier) talks to the slurmstepd of
/// the run it was restored in. Requeued in the middle of its optimisation
/// and restored on node2, it converges with the energies of an uninterrupted
/// run, every one printed once.
#[test]
fn nwchem_under_srun_pmi2_requeued_restores_on_the_other_node_with_the_uninterrupted_energies() {
    let (out, expected) = nwchem_requeued_and_uninterrupted(cluster(), &[], "--mpi=pmi2 -n 1", NWCHEM, 6, TASK_0);
    assert!(nwchem_energies(&expected).len() > 10, "{expected}");
    assert_eq!(nwchem_energies(&out), nwchem_energies(&expected), "energies differ from an uninterrupted run");
}

/// A job that gives UCX its SysV transport back (`UCX_TLS`, its own value
/// wins over the protected container's default) gets one line saying why
/// its checkpoint is not taken, and starts over.
#[test]
fn nwchem_with_ucx_sysv_is_not_checkpointed_and_says_why() {
    let c = cluster();
    let job = nwchem_job(c, &["-w", "node1", "--export=ALL,UCX_TLS=all"], "--mpi=pmi2 -n 1", NWCHEM);
    requeue_when(c, &job, || !nwchem_energies(&job.output()).is_empty());
    let out = job.output();
    let line = out.lines().find(|l| l.contains("checkpoint of task 0 of step")).unwrap_or_default();
    assert!(line.contains("has SysV shared memory attached (shmget)") && line.ends_with("it will run again from the start"), "{out}");
    job.cleanup(c);
}

/// MPICH's own launcher inside one container: `mpiexec` (Hydra), its proxy
/// and 2 NWChem ranks are one tree, talking over loopback and UCX's
/// shared memory. Requeued mid-optimisation and restored on node2, it does
/// every optimisation step once and converges to the uninterrupted run's
/// energy (2-rank sums are not bit-reproducible: 1e-6 Hartree). The stop
/// before the dump sends no process a second SIGSTOP, which stayed pending
/// and made CRIU fail on `mpiexec` (`Unexpected 13 task interruption`).
#[test]
fn nwchem_two_ranks_under_mpiexec_in_one_container_requeued_restore_on_the_other_node() {
    let mpiexec = format!("mpiexec.mpich -launcher fork -n 2 {NWCHEM}");
    // A CPU per rank: two ranks polling on one CPU crawl.
    let (out, expected) = nwchem_requeued_and_uninterrupted(cluster(), &["-c", "2"], "", &mpiexec, 4, TASK_0);
    assert_same_optimisation(&out, &expected);
}

/// Two runs of the 2-rank optimisation: every step once, and the final
/// energy within 1e-6 Hartree (2-rank sums are not bit-reproducible).
fn assert_same_optimisation(out: &str, expected: &str) {
    let energy = |text: &str| -> f64 {
        let last = nwchem_energies(text).last().copied().unwrap_or_default();
        last.rsplit('=').next().and_then(|v| v.trim().parse().ok()).unwrap_or(f64::NAN)
    };
    assert_eq!(nwchem_energies(out).len(), nwchem_energies(expected).len(), "each step once:\n{out}");
    assert!((energy(out) - energy(expected)).abs() < 1e-6, "{} vs {}", energy(out), energy(expected));
}

/// `srun --mpi=pmi2 -n 2`: Slurm starts the 2 NWChem ranks as 2 tasks, which
/// share UCX's memory and talk to slurmstepd's PMI each on its own socket.
/// Protected, they run in one container as children of the ranks launcher
/// (helper/src/agent/ranks.rs), each with its own task's stdio and relayed
/// PMI socket. Requeued mid-optimisation, the step is dumped as one tree
/// and restored together on node2: every step once, the uninterrupted
/// energy, and each rank's output still labelled with its own task.
#[test]
fn nwchem_two_ranks_under_srun_pmi2_requeued_restore_together_on_the_other_node() {
    let (out, expected) = nwchem_requeued_and_uninterrupted(cluster(), &["-n", "2"], "--mpi=pmi2 -n 2 -l", NWCHEM, 4, TWO_RANKS);
    assert!(expected.contains("0:     nproc           =        2"), "{expected}");
    assert_same_optimisation(&out, &expected);
    // Each rank's own stdout reaches srun as its task's, after the restore too.
    let last = out.lines().rfind(|l| l.contains("ARMCI") || l.contains("Total times")).unwrap_or_default();
    assert!(last.starts_with("0: "), "{out}");
}
