//! The kernels' parallel loops (`cpu::parallel`) on each runtime: rayon, and OpenMP through the system's GNU
//! libgomp, loaded here before the first loop as torch loads its own (skipped where the system has none).
//! The runtime choice is per process, so the tests take turns (`TURN`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

use _core::cpu::parallel::{self, Choice, Runtime, Team, FAILED};
use _core::cpu::view::ViewError;

static TURN: Mutex<()> = Mutex::new(());

/// Loads libgomp (once, before any loop), takes this test's turn and returns the runtimes to test.
fn runtimes() -> (MutexGuard<'static, ()>, Vec<Choice>) {
    static LOAD: Once = Once::new();
    LOAD.call_once(|| {
        // SAFETY: loading the system's libgomp runs its initialisers, which only set up its own state.
        let handle = unsafe { libc::dlopen(c"libgomp.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        parallel::find_openmp();
        if handle.is_null() {
            eprintln!("no libgomp.so.1 on this system: OpenMP runs untested here");
        } else {
            assert!(parallel::openmp_library().is_some_and(|path| path.contains("libgomp")), "libgomp loaded but not found");
        }
    });
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut choices = vec![Choice::Rayon];
    if parallel::openmp_library().is_some() {
        choices.push(Choice::OpenMp);
    }
    (turn, choices)
}

fn on(choice: Choice) {
    let runtime = parallel::set_choice(Some(choice)).expect("runtime available");
    assert_eq!(runtime, if choice == Choice::Rayon { Runtime::Rayon } else { Runtime::OpenMp });
}

#[test]
fn every_task_runs_exactly_once() {
    let (_turn, choices) = runtimes();
    for choice in choices {
        on(choice);
        for threads in [1, 2, 3, 8] {
            for tasks in [0, 1, 2, 7, 1000] {
                let runs: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                let inits = AtomicUsize::new(0);
                let done: Result<(), ViewError> = Team::new(threads).for_each_init(
                    tasks,
                    || {
                        inits.fetch_add(1, Ordering::Relaxed);
                        Ok(Vec::<usize>::new())
                    },
                    |seen, task| {
                        seen.push(task);
                        runs[task].fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    },
                );
                done.unwrap();
                assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1), "{choice:?} {threads} threads, {tasks} tasks");
                // One scratch per worker that took a task, made once.
                assert!(inits.load(Ordering::Relaxed) <= threads.min(tasks), "{choice:?}: {} inits", inits.load(Ordering::Relaxed));
            }
        }
    }
}

/// Tasks come in groups of neighbours ("slices" of 125 tasks) that a worker loads once each time it moves to
/// another group, as the kernels load a (batch, head) slice's keys. Owned ranges keep the loads near one per
/// group (at most the groups plus two per worker); a shared counter hands every worker tasks of every group
/// (16 loads for 8 groups and 2 workers).
#[test]
fn neighbouring_tasks_stay_with_one_worker() {
    let (_turn, choices) = runtimes();
    for choice in choices {
        on(choice);
        let (groups, per_group, workers) = (8, 125, 2);
        let loads = AtomicUsize::new(0);
        Team::new(workers)
            .for_each_init(
                groups * per_group,
                || Ok(None),
                |loaded: &mut Option<usize>, task| {
                    let group = task / per_group;
                    if *loaded != Some(group) {
                        *loaded = Some(group);
                        loads.fetch_add(1, Ordering::Relaxed);
                    }
                    // A few microseconds of work, so that both workers take part.
                    let start = std::time::Instant::now();
                    while start.elapsed() < std::time::Duration::from_micros(5) {
                        std::hint::spin_loop();
                    }
                    Ok(())
                },
            )
            .unwrap();
        let loads = loads.load(Ordering::Relaxed);
        assert!(loads <= groups + 2 * workers, "{choice:?}: {loads} group loads for {groups} groups");
    }
}

#[test]
fn map_keeps_task_order_and_chunks_cover_the_slice() {
    let (_turn, choices) = runtimes();
    for choice in choices {
        on(choice);
        let team = Team::new(2);
        let squares: Vec<usize> = team.map(100, |i| Ok::<_, ViewError>(i * i)).unwrap();
        assert_eq!(squares, (0..100).map(|i| i * i).collect::<Vec<_>>());
        let mut data = vec![0usize; 103];
        team.chunks_mut(&mut data, 10, || Ok::<_, ViewError>(()), |_, i, chunk| {
            assert_eq!(chunk.len(), if i == 10 { 3 } else { 10 });
            chunk.iter_mut().for_each(|x| *x += i + 1);
            Ok(())
        })
        .unwrap();
        assert_eq!(data, (0..103).map(|j| j / 10 + 1).collect::<Vec<_>>());
        let (mut a, mut b) = (vec![0u8; 12], vec![0u32; 20]);
        team.zip_chunks_mut((&mut a, 4), (&mut b, 5), || Ok::<_, ViewError>(()), |_, i, x, y| {
            x.fill(i as u8 + 1);
            y.fill(i as u32 + 1);
            Ok(())
        })
        .unwrap();
        assert_eq!(a, [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]);
        assert_eq!(&b[15..], [0; 5], "three chunks of a: the fourth of b untouched");
        assert_eq!(&b[..15], &[[1; 5], [2; 5], [3; 5]].concat());
        let zero_chunk = team.chunks_mut(&mut data, 0, || Ok::<_, ViewError>(()), |_, _, _| Ok(()));
        assert!(zero_chunk.unwrap_err().0.starts_with(FAILED));
    }
}

#[test]
fn errors_of_tasks_and_of_init_are_returned() {
    let (_turn, choices) = runtimes();
    for choice in choices {
        on(choice);
        let team = Team::new(2);
        let failed = team.for_each(50, |i| if i == 17 { Err(ViewError(format!("task {i}"))) } else { Ok(()) });
        assert_eq!(failed, Err(ViewError("task 17".into())));
        let started = AtomicUsize::new(0);
        let failed = team.for_each_init(
            50,
            || Err::<(), _>(ViewError("no scratch".into())),
            |_, _| {
                started.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
        );
        assert_eq!(failed, Err(ViewError("no scratch".into())));
        assert_eq!(started.load(Ordering::Relaxed), 0);
        let mapped = team.map(10, |i| if i == 3 { Err(ViewError("three".into())) } else { Ok(i) });
        assert_eq!(mapped, Err(ViewError("three".into())));
    }
}

#[test]
fn a_panicking_task_is_an_error() {
    let (_turn, choices) = runtimes();
    for choice in choices {
        on(choice);
        let failed = Team::new(2).for_each(20, |i| -> Result<(), ViewError> {
            if i == 5 {
                panic!("task five");
            }
            Ok(())
        });
        let message = failed.unwrap_err().0;
        assert!(message.starts_with(FAILED) && message.contains("task five"), "{message}");
        // The team still works afterwards.
        assert_eq!(Team::new(2).map(4, Ok::<_, ViewError>).unwrap(), [0, 1, 2, 3]);
    }
}

#[test]
fn nested_loops_and_concurrent_callers_finish() {
    let (_turn, choices) = runtimes();
    for choice in choices {
        on(choice);
        let team = Team::new(2);
        let inner_runs = AtomicUsize::new(0);
        team.for_each(8, |_| {
            team.for_each(8, |_| {
                inner_runs.fetch_add(1, Ordering::Relaxed);
                Ok::<_, ViewError>(())
            })
        })
        .unwrap();
        assert_eq!(inner_runs.load(Ordering::Relaxed), 64);
        // Several threads starting loops at once, each with its own team (OpenMP: one per calling thread).
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 1..=4 {
                let total = &total;
                s.spawn(move || {
                    for _ in 0..20 {
                        let sums = Team::new(t).map(64, Ok::<_, ViewError>).unwrap();
                        total.fetch_add(sums.iter().sum::<usize>(), Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 20 * (63 * 64 / 2));
    }
}

#[test]
fn choices_are_checked() {
    let (_turn, _) = runtimes();
    assert_eq!(Choice::parse(" OpenMP "), Some(Choice::OpenMp));
    assert_eq!(Choice::parse("tbb"), None);
    assert_eq!(parallel::set_choice(Some(Choice::Rayon)), Ok(Runtime::Rayon));
    let auto = parallel::set_choice(Some(Choice::Auto)).unwrap();
    assert_eq!(auto == Runtime::OpenMp, parallel::openmp_library().is_some());
    if parallel::openmp_library().is_none() {
        // Asking for OpenMP without a runtime fails and keeps the choice before.
        assert!(parallel::set_choice(Some(Choice::OpenMp)).is_err());
        assert_eq!(parallel::runtime(), Ok(Runtime::Rayon));
    }
    parallel::set_choice(None).unwrap();
}
